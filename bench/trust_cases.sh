#!/bin/bash
# usage: bench/trust_cases.sh CODE_ROOT /ABSOLUTE/OUT.tsv   -- issue 22's bundle-trust, verdict and own-input cases:
# each case's command, exit code, last stderr line and the files left, one TSV row each (docs/reliability.md)
ROOT=$1; OUT=$2; W=$(mktemp -d /tmp/trust-cases.XXXX); cd $W
V=/work/shared/data/videos
A="timeout 300 env PYTHONPATH=$ROOT python -m runtime.cli"
RUN="--video $V/bikes.mp4 --prompt hi --max-new-tokens 2 --quiet"
rec() { # name, files-dir, command...
  local name=$1 dir=$2; shift 2
  "$@" >out.txt 2>err.txt; rc=$?
  line=$(grep -v '^\s*$' err.txt | tail -1 | cut -c1-220)
  [ -z "$line" ] && line="(stdout) $(grep -v '^\s*$' out.txt | tail -1 | cut -c1-160)"
  left=$( [ "$dir" != - ] && [ -e "$dir" ] && (ls -A "$dir" 2>/dev/null | tr '\n' ' ') )
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$line" "$left" >> $OUT
}
edit() { # DIR PYTHON: a copy of the bundle b at DIR, then PYTHON run with d = DIR, data = bundle.json, save(), rehash(name)
  cp -r b "$1"
  python - "$1" <<PY
import hashlib, json, sys
from pathlib import Path
d = Path(sys.argv[1]); data = json.loads((d / "bundle.json").read_text())
sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
def save(): (d / "bundle.json").write_text(json.dumps(data))
def rehash(name): data["files"][name] = sha(d / name)
def flip(name):
    b = bytearray((d / name).read_bytes()); b[len(b) // 2] ^= 0xFF; (d / name).write_bytes(bytes(b))
$2
PY
}
$A export --frames 4 --out e --quiet >setup.log 2>&1
$A quantize-llm --out llm --quiet >>setup.log 2>&1
$A bundle --model e --llm llm --out b --quiet >>setup.log 2>&1
rec "run --model b (the bundle as written)" - $A run --model b $RUN
# 1 confinement: every file inside, listed and hashed
edit bu "(d / 'text/notes.txt').write_text('not listed')"
rec "run: an unlisted file text/notes.txt" - $A run --model bu $RUN
edit babs "data['files']['/etc/passwd'] = sha('/etc/passwd'); save()"
rec "run: bundle.json lists /etc/passwd (its real sha256)" - $A run --model babs $RUN
echo secret > outside.txt
edit bdot "data['files']['../outside.txt'] = sha(d / '../outside.txt'); save()"
rec "run: bundle.json lists ../outside.txt (its real sha256)" - $A run --model bdot $RUN
edit bsym "(d / 'text/tokenizer.json').unlink(); (d / 'text/tokenizer.json').symlink_to('/etc/passwd'); rehash('text/tokenizer.json'); save()"
rec "run: text/tokenizer.json -> /etc/passwd (rehashed)" - $A run --model bsym $RUN
edit bdrop "flip('vision/vision_aot.onnx.data'); del data['files']['vision/vision_aot.onnx.data']; save()"
rec "run: vision weights altered, their entry dropped" - $A run --model bdrop $RUN
edit bempty "flip('vision/vision_aot.onnx.data'); data['files'] = {}; save()"
rec "run: \"files\": {} (vision weights altered)" - $A run --model bempty $RUN
edit bgenai "
g = json.loads((d / 'llm/genai_config.json').read_text()); g['model']['decoder']['filename'] = '../vision/vision_aot.onnx'
(d / 'llm/genai_config.json').write_text(json.dumps(g))
m = json.loads((d / 'llm/llm.json').read_text()); m['files']['genai_config.json'] = sha(d / 'llm/genai_config.json')
m['sizes']['genai_config.json'] = (d / 'llm/genai_config.json').stat().st_size; (d / 'llm/llm.json').write_text(json.dumps(m))
rehash('llm/genai_config.json'); rehash('llm/llm.json'); save()"
rec "run: genai_config.json filename ../vision/vision_aot.onnx (rehashed)" - $A run --model bgenai $RUN
edit blist "(d / 'bundle.json').write_text('[]')"
rec "run: bundle.json is []" - $A run --model blist $RUN
edit bflist "data['files'] = sorted(data['files']); save()"
rec "run: bundle.json files is a list" - $A run --model bflist $RUN
edit bflav "data['vision']['flavour'] = 'openvino'; save()"
rec "run: unknown vision flavour" - $A run --model bflav $RUN
edit bemb "
import numpy as np
t = np.load(d / 'text/embeddings.npy'); np.save(d / 'text/embeddings.npy', t[: len(t) // 2]); rehash('text/embeddings.npy'); save()"
rec "run: embedding table half the vocabulary (rehashed)" - $A run --model bemb $RUN
edit bframes "data['frames'] = 8; data['export_manifest']['inputs'][0]['shape'][0] = 8; save()"
rec "run: bundle.json frames 4 -> 8 (and its input shape)" - $A run --model bframes $RUN
cp -r e eu && echo "not listed" > eu/notes.txt
rec "check eu (an export with an unlisted notes.txt)" - $A check eu --no-tensorrt --quiet
rec "bundle --out bid (prints the id)" bid $A bundle --model e --llm llm --out bid --quiet
ID=$(python -c "import hashlib; print(hashlib.sha256(open('bid/bundle.json','rb').read()).hexdigest())")
rec "run --model bid --expect-id (its sha256)" - $A run --model bid --expect-id $ID $RUN
rec "run --model bid --expect-id (another sha256)" - $A run --model bid --expect-id $(printf '0%.0s' {1..64}) $RUN
edit bidx "data['frames'] = data['frames']; data['note'] = 'edited'; save()"
rec "run --model (b edited) --expect-id (b's sha256)" - $A run --model bidx --expect-id $(python -c "import hashlib; print(hashlib.sha256(open('b/bundle.json','rb').read()).hexdigest())") $RUN
# 2 verdicts travel (from an export with the fixed Sinkhorn solver, which calibrate and quantize-weights take on any tree)
echo '{"frames": 4, "sinkhorn": "fixed"}' > fixed.json
$A export --config fixed.json --out ef --quiet >>setup.log 2>&1
$A calibrate ef --videos $V/bigbuckbunny.mp4 --holdout $V/bikes.mp4 --precision int8 --clips-per-video 1 --out q8 --quiet >>setup.log 2>&1
rec "bundle --model q8 (calibration FAILED)" bq8 $A bundle --model q8 --llm llm --out bq8 --quiet
rec "run --model bq8" - $A run --model bq8 $RUN
rec "bundle --model q8 --allow-failed" bq8f $A bundle --model q8 --llm llm --out bq8f --allow-failed --quiet
rec "run --model bq8f (forced bundle)" - $A run --model bq8f $RUN
rec "run --model bq8f --allow-failed" - $A run --model bq8f --allow-failed $RUN
rec "live --model bq8f (forced bundle)" - $A live --model bq8f --source $V/bikes.mp4 --duration 4 --prompt hi --max-new-tokens 2 --quiet
$A quantize-weights ef --out w8 --quiet >>setup.log 2>&1
rec "validate w8 (anchor agreement < 0.98)" - $A validate w8 --video $V/bikes.mp4 --quiet
python -c "import json; print('w8 manifest extra keys:', sorted(json.load(open('w8/manifest.json'))['extra']))" >> $OUT
rec "bundle --model w8 (validate FAILED)" bw8 $A bundle --model w8 --llm llm --out bw8 --quiet
# 3 no command writes over its own input (each case on a fresh copy of the fp32 export e)
cp -r e e2
rec "quantize-weights e2 --out e2 --force" e2 $A quantize-weights e2 --out e2 --force --quiet
python -c "import json; print('e2 precision after:', json.load(open('e2/manifest.json'))['precision'])" >> $OUT
cp -r e e3; ln -s . here
rec "quantize-weights e3 --out here/e3 --force (here -> .)" e3 $A quantize-weights e3 --out here/e3 --force --quiet
python -c "import json; print('e3 precision after:', json.load(open('e3/manifest.json'))['precision'])" >> $OUT
cp -r e e4
rec "quantize-weights e4 --out e4/w8" e4 $A quantize-weights e4 --out e4/w8 --quiet
cp -r e e5
rec "build e5 --target rtx --precision fp32 --out e5/engine" e5 $A build e5 --target rtx --precision fp32 --out e5/engine --quiet
rec "check e5 (after the build above)" - $A check e5 --no-tensorrt --quiet
cp -r e e6
rec "calibrate e6 --out e6 --force" e6 $A calibrate e6 --videos $V/bigbuckbunny.mp4 --holdout $V/bikes.mp4 --precision int8 --clips-per-video 1 --out e6 --force --quiet
cp -r b b2
rec "bundle --model b2/vision --llm b2/llm --out b2 --force" b2 $A bundle --model b2/vision --llm b2/llm --out b2 --force --quiet
echo "scratch: $W" >> $OUT
