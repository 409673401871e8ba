# SoftHSM2 for the PKCS#11 seal tests (tests/seal.rs). Sourced by .ci/run (as root, bash):
# installs softhsm2 when missing, creates a throwaway token directory with one initialized
# token, exports what the tests read, and registers its cleanup in CLEANUPS.
if ! command -v softhsm2-util >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi
WV_SOFTHSM_DIR=$(mktemp -d)
CLEANUPS+=("rm -rf '$WV_SOFTHSM_DIR'")
mkdir -p "$WV_SOFTHSM_DIR/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$WV_SOFTHSM_DIR/tokens" > "$WV_SOFTHSM_DIR/softhsm2.conf"
export SOFTHSM2_CONF="$WV_SOFTHSM_DIR/softhsm2.conf"
export WEIGHTVAULT_TEST_PKCS11_TOKEN=weightvault
export WEIGHTVAULT_TEST_PKCS11_PIN=1234
softhsm2-util --init-token --free --label "$WEIGHTVAULT_TEST_PKCS11_TOKEN" \
  --so-pin 5678 --pin "$WEIGHTVAULT_TEST_PKCS11_PIN" >/dev/null
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
  if [ -f "$m" ]; then export WEIGHTVAULT_TEST_PKCS11_MODULE="$m"; break; fi
done
if [ -z "${WEIGHTVAULT_TEST_PKCS11_MODULE:-}" ]; then
  echo "softhsm.sh: libsofthsm2.so not found" >&2
  return 1
fi
echo "softhsm: token $WEIGHTVAULT_TEST_PKCS11_TOKEN in $WV_SOFTHSM_DIR, module $WEIGHTVAULT_TEST_PKCS11_MODULE"
