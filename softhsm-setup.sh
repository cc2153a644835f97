#!/usr/bin/env bash
# Creates SoftHSM tokens in a directory of their own, idempotently, and prints the
# `export SOFTHSM2_CONF=...` line that makes PKCS#11 programs see them.
#
#   softhsm-setup.sh DIR LABEL...            e.g.  softhsm-setup.sh /tmp/tokens ca officer1 node-a
#
# PINs: the user PIN is $SOFTHSM_PIN and the SO PIN $SOFTHSM_SO_PIN; when unset, a random PIN is
# made for each new token. Either way each token's user PIN is written to DIR/LABEL.pin (mode 600)
# for --pin-file, and its SO PIN to DIR/LABEL.so-pin. No PIN is ever put on a command line
# (softhsm2-util takes them only as arguments, visible to every user through ps), so tokens are
# initialised through the PKCS#11 API itself (C_InitToken, C_InitPIN) from Python's ctypes.
# Labels may also come from $SOFTHSM_TOKENS (space-separated). A token that exists is left as is.
set -euo pipefail

usage() { echo "usage: $0 DIR [LABEL...]   (labels also from \$SOFTHSM_TOKENS)" >&2; exit 2; }
[ $# -ge 1 ] || usage
dir=$1; shift
labels=("$@")
if [ ${#labels[@]} -eq 0 ] && [ -n "${SOFTHSM_TOKENS:-}" ]; then read -r -a labels <<<"$SOFTHSM_TOKENS"; fi
[ ${#labels[@]} -gt 0 ] || usage

module=${EXCHANGED_PKCS11_MODULE:-}
if [ -z "$module" ]; then
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
        [ -e "$m" ] && { module=$m; break; }
    done
fi
[ -n "$module" ] && [ -e "$module" ] || { echo "$0: SoftHSM not found: apt-get install softhsm2 (or run tools/setup)" >&2; exit 1; }

umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf=$dir/softhsm2.conf
if [ ! -f "$conf" ]; then
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' "$dir" > "$conf"
fi
export SOFTHSM2_CONF=$conf

for label in "${labels[@]}"; do
    case "$label" in ''|*/*|*' '*) echo "$0: bad token label: '$label'" >&2; exit 2;; esac
    [ ${#label} -le 32 ] || { echo "$0: token label longer than 32 characters: $label" >&2; exit 2; }
    pinfile=$dir/$label.pin sopinfile=$dir/$label.so-pin
    pin=${SOFTHSM_PIN:-} sopin=${SOFTHSM_SO_PIN:-}
    [ -n "$pin" ] || { [ -s "$pinfile" ] && pin=$(cat "$pinfile"); } || true
    [ -n "$sopin" ] || { [ -s "$sopinfile" ] && sopin=$(cat "$sopinfile"); } || true
    [ -n "$pin" ] || pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    [ -n "$sopin" ] || sopin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    status=$(P11_MODULE=$module P11_LABEL=$label P11_PIN=$pin P11_SO_PIN=$sopin python3 - <<'PY'
import ctypes, os, sys
CKF_TOKEN_INITIALIZED, CKF_RW_SESSION, CKF_SERIAL_SESSION, CKU_SO = 0x400, 0x2, 0x4, 0
ul = ctypes.c_ulong
lib = ctypes.CDLL(os.environ["P11_MODULE"])
label = os.environ["P11_LABEL"].encode()
pin, so_pin = os.environ["P11_PIN"].encode(), os.environ["P11_SO_PIN"].encode()

def check(rv, what):
    if rv != 0:
        sys.exit(f"softhsm-setup: {what} failed: CKR 0x{rv:x}")

def slots():
    n = ul()
    check(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(n)), "C_GetSlotList")
    ids = (ul * n.value)()
    check(lib.C_GetSlotList(ctypes.c_ubyte(1), ids, ctypes.byref(n)), "C_GetSlotList")
    for sid in ids[: n.value]:
        info = ctypes.create_string_buffer(512)  # CK_TOKEN_INFO: label[32] ... flags at offset 96
        check(lib.C_GetTokenInfo(ul(sid), info), "C_GetTokenInfo")
        flags = ul.from_buffer_copy(info.raw[96:96 + ctypes.sizeof(ul)]).value
        yield sid, info.raw[:32].rstrip(b" \0"), bool(flags & CKF_TOKEN_INITIALIZED)

check(lib.C_Initialize(None), "C_Initialize")
try:
    if any(l == label and init for _, l, init in slots()):
        print("exists"); sys.exit(0)
    free = [sid for sid, _, init in slots() if not init]
    if not free:
        sys.exit("softhsm-setup: no free SoftHSM slot")
    check(lib.C_InitToken(ul(free[0]), so_pin, ul(len(so_pin)), label.ljust(32, b" ")),
          "C_InitToken")
    (sid,) = [sid for sid, l, init in slots() if l == label and init]
    h = ul()
    check(lib.C_OpenSession(ul(sid), ul(CKF_SERIAL_SESSION | CKF_RW_SESSION), None, None,
                            ctypes.byref(h)), "C_OpenSession")
    check(lib.C_Login(h, ul(CKU_SO), so_pin, ul(len(so_pin))), "C_Login(SO)")
    check(lib.C_InitPIN(h, pin, ul(len(pin))), "C_InitPIN")
    lib.C_Logout(h); lib.C_CloseSession(h)
    print("created")
finally:
    lib.C_Finalize(None)
PY
)
    if [ "$status" = created ] || [ ! -s "$pinfile" ]; then
        printf '%s\n' "$pin" > "$pinfile"; printf '%s\n' "$sopin" > "$sopinfile"
    fi
    echo "softhsm-setup: token '$label' $status (PIN file $pinfile)" >&2
done
echo "export SOFTHSM2_CONF=$conf"
