#!/usr/bin/env bash
# Fetch ONNX Runtime C/C++ API headers from Debian trixie's libonnxruntime-dev package,
# without touching the system's apt configuration: a private sources list and lists
# directory are passed to apt-get with -o, and the .deb is unpacked with dpkg -x.
#
# usage: fetch_ort_headers.sh DEST_DIR     (prints the include directory on success)
set -euo pipefail

dest=${1:?usage: fetch_ort_headers.sh DEST_DIR}
inc="$dest/root/usr/include/onnxruntime"
if [ -f "$inc/onnxruntime_c_api.h" ]; then echo "$inc"; exit 0; fi

mkdir -p "$dest/lists/partial" "$dest/archives/partial" "$dest/debs"
# The machine's own Debian mirror (first URIs line of its deb822 sources, else sources.list).
uri=$(grep -hm1 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true)
if [ -z "$uri" ]; then
  uri=$(grep -hm1 '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' || true)
fi
uri=${uri:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $uri trixie main" > "$dest/sources.list"

opts=(-o "Dir::Etc::SourceList=$dest/sources.list" -o "Dir::Etc::SourceParts=-"
      -o "Dir::State::Lists=$dest/lists" -o "Dir::Cache::Archives=$dest/archives"
      -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update >&2
( cd "$dest/debs" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2 )
for deb in "$dest"/debs/*.deb; do dpkg -x "$deb" "$dest/root"; done
[ -f "$inc/onnxruntime_c_api.h" ] || { echo "fetch_ort_headers: onnxruntime_c_api.h not found in libonnxruntime-dev" >&2; exit 1; }
echo "$inc"
