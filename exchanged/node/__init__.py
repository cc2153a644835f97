"""The unit's node: configuration, the daemon (`exchanged serve`) and its local control socket."""
