"""Public-key infrastructure: tokens, CSRs, the CA, CRLs and validation."""
