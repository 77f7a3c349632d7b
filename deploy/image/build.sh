#!/bin/sh
# Builds nereid's container image with podman (or buildah): FROM scratch, holding `nereid`
# (stripped), ONNX Runtime's shared library, the shipped plugins and the C libraries they load,
# taken from this machine's Debian, and a non-root user (10001). Nothing is pulled: the image
# builds offline, and the staged context builds the same with `docker build` elsewhere.
#
# usage: deploy/image/build.sh [--tag TAG] [--context DIR] [--storage DIR] [--binary FILE]
#   --tag      the image's name [nereid:latest]
#   --context  where the build context is staged [target/image]
#   --storage  a podman storage directory of its own (vfs driver), instead of the system's
#   --binary   the nereid executable [target/release/nereid]
# Prints the image's ID on the last line of stdout.
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
tag=nereid:latest
context=$target/image
storage=
binary=$target/release/nereid
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --context) context=$2; shift 2 ;;
        --storage) storage=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ort=$target/onnxruntime
plugins=$target/wasm32-wasip2/plugin
for need in "$binary" "$ort/libonnxruntime.so" "$plugins/nereid_fedavg.wasm"; do
    [ -e "$need" ] || { echo "build.sh: $need is missing: run \`cargo xtask plugins\` and \`cargo build --release\` first" >&2; exit 1; }
done
command -v podman >/dev/null || { echo "build.sh: podman is needed (Debian: apt-get install podman buildah)" >&2; exit 1; }

rm -rf "$context"
fs=$context/rootfs
mkdir -p "$fs/usr/local/bin" "$fs/usr/local/lib/nereid" "$fs/usr/share/nereid/plugins" "$fs/etc/ssl/certs" \
    "$fs/tmp" "$fs/proc" "$fs/dev" "$fs/sys" "$fs/var/lib/nereid" "$context/state"
chmod 1777 "$fs/tmp"

strip -o "$fs/usr/local/bin/nereid" "$binary"
cp -P "$ort"/libonnxruntime.so* "$fs/usr/local/lib/nereid/"
# The shipped plugins: the Rust crates under plugins/ (not the test fixtures; the Python and
# JavaScript examples there carry their interpreters, 12-18 MB each, and stay out).
for dir in "$root"/plugins/*/; do
    [ -f "$dir/Cargo.toml" ] || continue
    component=$plugins/nereid_$(basename "$dir" | tr - _).wasm
    [ -f "$component" ] || { echo "build.sh: $component is missing: run \`cargo xtask plugins\`" >&2; exit 1; }
    cp "$component" "$fs/usr/share/nereid/plugins/"
done

# The C libraries the executable and ONNX Runtime load, at the paths the loader looks in.
for lib in $( (ldd "$binary"; ldd "$ort/libonnxruntime.so") | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }' | sort -u); do
    mkdir -p "$fs$(dirname "$lib")"
    cp -L "$lib" "$fs$lib"
done
[ -e /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnereid:x:10001:10001:nereid:/var/lib/nereid:/sbin/nologin\n' > "$fs/etc/passwd"
printf 'root:x:0:\nnereid:x:10001:\n' > "$fs/etc/group"
printf 'hosts: files dns\n' > "$fs/etc/nsswitch.conf"

set -- podman
[ -n "$storage" ] && set -- podman --root "$storage/root" --runroot "$storage/run" --storage-driver vfs
"$@" build --quiet --format oci --file "$root/deploy/image/Containerfile" --tag "$tag" "$context"
