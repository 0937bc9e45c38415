#!/usr/bin/env bash
# Builds the chat page into dist/ (served by `corolla demo` and by `relay --http-listen ...
# --web-root dist`) with cargo and wasm-bindgen alone: the wasm32 build of `web-app`, its
# JavaScript glue, the stylesheet, and an index.html that loads them. Asset names carry a hash
# of their content (the page itself is served `no-cache`, the rest may be cached). Trunk
# (`Trunk.toml`, `trunk build --release`) builds the same page; this script does not need it,
# which saves building Trunk from source (~10 minutes) on a first run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/tools.sh

out="${1:-dist}"
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --target wasm32-unknown-unknown -p web-app --bin web-app
wasm="$target_dir/wasm32-unknown-unknown/release/web-app.wasm"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
hash_of() { sha256sum "$1" | cut -c1-16; }
name="web-app-$(hash_of "$wasm")"
wasm-bindgen --target web --no-typescript --out-dir "$stage" --out-name "$name" "$wasm"
css="style-$(hash_of www/style.css).css"
cp www/style.css "$stage/$css"
title="$(sed -n 's:.*<title>\(.*\)</title>.*:\1:p' www/index.html)"
cat > "$stage/index.html" <<HTML
<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <title>$title</title>
    <link rel="stylesheet" href="/$css" />
    <link rel="modulepreload" href="/$name.js" />
    <link rel="preload" href="/${name}_bg.wasm" as="fetch" type="application/wasm" crossorigin="anonymous" />
    <script type="module">
      import init from "/$name.js";
      await init({ module_or_path: "/${name}_bg.wasm" });
    </script>
  </head>
  <body></body>
</html>
HTML
# Replace dist/ whole, so no stale asset of an earlier build stays behind.
rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -r "$stage" "$out"
chmod 755 "$out"
echo "built the chat page into $out/ ($(du -sh "$out" | cut -f1))" >&2
