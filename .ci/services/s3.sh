# Sourced by .ci/run (as root, bash, set -euo pipefail): starts an S3-compatible server (moto,
# from PyPI into a throwaway virtualenv) on 127.0.0.1, creates the test bucket, exports
# WEIGHTVAULT_TEST_S3 for tests/backends.rs and tests/replicas.rs, and registers its cleanup
# in CLEANUPS. Each test writes under its own key prefix.
wv_s3_port=5055
wv_s3_bucket=weightvault-test
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "s3: python3-venv missing; installing it with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
wv_s3_dir=$(mktemp -d)
python3 -m venv "$wv_s3_dir/venv"
# Pinned: the version the suite was last run against (a new release can change S3 semantics).
"$wv_s3_dir/venv/bin/pip" install -q "moto[server]==5.2.1"
"$wv_s3_dir/venv/bin/moto_server" -H 127.0.0.1 -p "$wv_s3_port" >"$wv_s3_dir/moto.log" 2>&1 &
wv_s3_pid=$!
CLEANUPS+=("kill $wv_s3_pid; rm -rf '$wv_s3_dir'")
wv_s3_ready=
for _ in $(seq 1 300); do
  if "$wv_s3_dir/venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$wv_s3_port/')" 2>/dev/null; then
    wv_s3_ready=1
    break
  fi
  sleep 0.2
done
if [ -z "$wv_s3_ready" ]; then
  echo "s3: moto did not answer on 127.0.0.1:$wv_s3_port within 60 s; its log:" >&2
  tail -n 20 "$wv_s3_dir/moto.log" >&2 || true
  return 1
fi
# boto3 comes with moto; any key is accepted by moto.
"$wv_s3_dir/venv/bin/python" - "$wv_s3_port" "$wv_s3_bucket" <<'PY'
import sys, boto3
port, bucket = sys.argv[1], sys.argv[2]
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
             aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=bucket)
PY
export WEIGHTVAULT_TEST_S3="http://127.0.0.1:$wv_s3_port/$wv_s3_bucket"
echo "s3: moto on 127.0.0.1:$wv_s3_port, bucket $wv_s3_bucket"
