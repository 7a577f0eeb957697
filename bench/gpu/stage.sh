#!/usr/bin/env bash
# Stage kedit's GPU benchmarks for an offline GPU machine that each call reaches with at most 64 MiB
# (the working tree plus carried folders). See bench/gpu/README.md.
#   bash bench/gpu/stage.sh build    # .gpu1/ (wheels + the GGUF's first part), .gpu2/ (the rest + data)
#   bash bench/gpu/stage.sh slim     # take the large tracked files out of the index (they stay on disk)
#   bash bench/gpu/stage.sh unslim   # put them back: run it before any commit
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=.git/info/exclude
LIMIT_MB=${LIMIT_MB:-60}   # per call: tree + carry must stay under 64 MiB
SLIM=(checkpoints/*.safetensors bench/results)

exclude() { mkdir -p "$(dirname $EXCLUDE)"; touch $EXCLUDE; grep -qxF "$1" $EXCLUDE || echo "$1" >> $EXCLUDE; }
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
tree_mb() { git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{print int($1/1048576)+1}'; }

case ${1:-build} in
  slim)
    git rm --cached -q -r --ignore-unmatch -- "${SLIM[@]}"
    exclude '/checkpoints/*.safetensors'; exclude '/bench/results/'
    echo "index slimmed: the tree that travels is $(tree_mb) MB; run 'bash bench/gpu/stage.sh unslim' before committing" ;;
  unslim)
    git reset -q -- checkpoints bench/results
    sed -i '\#^/checkpoints/\*\.safetensors$#d; \#^/bench/results/$#d' $EXCLUDE
    git status --short | head ;;
  build)
    : "${KEDIT_DATA:?set KEDIT_DATA to the folder holding zsre/ and counterfact/}"
    exclude /.gpu1/; exclude /.gpu2/
    rm -rf .gpu1 .gpu2 && mkdir -p .gpu1 .gpu2
    # the device image has transformers 5.17 (kedit needs >= 5.20) and no jsonargparse or gguf: pure-Python wheels
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu1 "transformers==$(version transformers)" \
        "jsonargparse==$(version jsonargparse)" "typeshed_client==$(version typeshed_client)" \
        "docstring_parser==$(version docstring_parser)" "gguf==$(version gguf)"
    gguf=$(python3 -c "from kedit.models.loading import _smollm2_gguf; print(_smollm2_gguf())")
    sha256sum "$gguf" | cut -d' ' -f1 > .gpu2/gguf.sha256
    tar -cJf .gpu2/data.tar.xz -C "$KEDIT_DATA" zsre counterfact
    wheels=$(du -cb .gpu1 | tail -1 | awk '{print int($1/1048576)+1}')
    tree=$(tree_mb) size=$(( $(stat -c %s "$gguf") / 1048576 + 1 ))
    part_a=$(( LIMIT_MB - wheels - tree - 2 ))
    if (( part_a < 8 || size - part_a + tree + 3 > LIMIT_MB )); then
        echo "the tree that travels is $tree MB: too much to carry the ${size} MB GGUF in two calls; run" \
             "'bash bench/gpu/stage.sh slim' first" >&2
        exit 1
    fi
    head -c $(( part_a * 1048576 )) "$gguf" > .gpu1/gguf.part_a
    tail -c +$(( part_a * 1048576 + 1 )) "$gguf" > .gpu2/gguf.part_b
    du -sh .gpu1 .gpu2
    echo "tree $tree MB; call 1 carries .gpu1, call 2 carries .gpu2 (bench/gpu/README.md)" ;;
  *) echo "usage: $0 build|slim|unslim" >&2; exit 2 ;;
esac
