#!/bin/bash
# usage: bench/reliability_cases.sh CODE_ROOT /ABSOLUTE/OUT.tsv   -- runs each case, records cmd, rc, last stderr line, files left
ROOT=$1; OUT=$2; W=$(mktemp -d /tmp/reliability-cases.XXXX); cd $W
V=/work/shared/data/videos
A="timeout 120 env PYTHONPATH=$ROOT python -m runtime.cli"
rec() { # name, files-dir, command...
  local name=$1 dir=$2; shift 2
  "$@" >out.txt 2>err.txt; rc=$?
  line=$(grep -v '^\s*$' err.txt | tail -1 | cut -c1-220)
  [ -z "$line" ] && line="(stdout) $(grep -v '^\s*$' out.txt | tail -1 | cut -c1-160)"
  left=$( [ -e "$dir" ] && (ls -A "$dir" 2>/dev/null | tr '\n' ' ') )
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$line" "$left" >> $OUT
}
$A export --frames 4 --out good --quiet >/dev/null 2>&1
$A quantize-llm --out llm --quiet >/dev/null 2>&1
# 1 data loss
mkdir -p u1/sub && echo x > u1/mine.txt && echo y > u1/sub/f
rec "export --out dir-with-user-files" u1 $A export --frames 4 --out u1 --quiet
echo keep > afile
rec "export --out existing-file" . $A export --frames 4 --out afile --quiet
mkdir -p u2 && echo x > u2/mine.txt
rec "calibrate --out dir-with-user-files" u2 $A calibrate good --videos $V/bigbuckbunny.mp4 --holdout $V/bikes.mp4 --precision int8 --clips-per-video 1 --out u2 --quiet
mkdir -p u3 && echo x > u3/mine.txt
rec "build --out dir-with-user-files" u3 $A build good --target rtx --precision fp32 --out u3 --quiet
echo "my notes" > notes.txt
rec "build --timing-cache notes.txt" . $A build good --target rtx --precision fp32 --out eng --timing-cache notes.txt --quiet
echo "notes.txt now: $(head -c 40 notes.txt | tr -dc '[:print:]')" >> $OUT
# 2 bench
rec "bench --widths 0 (timeout 60)" . timeout 60 env PYTHONPATH=$ROOT python -m runtime.cli bench --widths 0 --graph-frames 0 --retentions
rec "bench --repeats 0 (timeout 60)" . timeout 60 env PYTHONPATH=$ROOT python -m runtime.cli bench --widths 64 --repeats 0 --graph-frames 0 --retentions
rec "bench --retentions 2 (timeout 30)" . timeout 30 env PYTHONPATH=$ROOT python -m runtime.cli bench --retentions 2
# 3 environment
mkdir -p ro && chmod 555 ro
rec "export --out read-only/x" ro $A export --frames 4 --out ro/x --quiet
rec "build --workspace-mib -5" . $A build good --target rtx --precision fp32 --workspace-mib -5 --out eng2 --quiet
mkdir -p jdir
rec "check --json DIR" jdir $A check good --no-tensorrt --json jdir --quiet
rec "build --timing-cache DIR" . $A build good --target rtx --precision fp32 --timing-cache jdir --out eng3 --quiet
rec "visualize --out DIR" jdir $A visualize --frames 4 --video $V/bikes.mp4 --out jdir --quiet
cp -r good listman && echo '[1,2]' > listman/manifest.json
rec "check (manifest is a JSON list)" . $A check listman --no-tensorrt
$A build good --target rtx --precision fp32 --out eng --quiet >/dev/null 2>&1
cp -r eng listeng && echo '[]' > listeng/engine.json
rec "run --model engine-with-list-sidecar" . $A run --model listeng --video $V/bikes.mp4 --prompt hi --llm transformers
cp -r llm llmnodata && rm -f llmnodata/*.data
rec "run --llm LLM-missing-data" . $A run --model good --video $V/bikes.mp4 --prompt hi --llm llmnodata
# 4 integrity
cp -r llm llmtamper && python - <<'PY'
import glob; p=[f for f in glob.glob('llmtamper/*') if f.endswith('.data') or f.endswith('.onnx')]; p=max(p, key=lambda f: __import__('os').path.getsize(f))
b=bytearray(open(p,'rb').read()); b[len(b)//2]^=0xFF; open(p,'wb').write(bytes(b))
PY
rec "run --llm tampered-weights" . $A run --model good --video $V/bikes.mp4 --prompt hi --llm llmtamper --max-new-tokens 4
cp -r good counts && python - <<'PY'
import json; m=json.load(open('counts/manifest.json')); m['output_tokens']=999; m['inputs'][0]['shape'][0]=9; json.dump(m,open('counts/manifest.json','w'))
PY
rec "check (frame/token counts edited)" . $A check counts --no-tensorrt
rec "validate (frame/token counts edited)" . $A validate counts --video $V/bikes.mp4 --quiet
cp -r good hashbad && printf 'x' >> hashbad/vision_aot.onnx.data
rec "check (weights changed)" . $A check hashbad --no-tensorrt
# 5 failures stick
$A calibrate good --videos $V/bigbuckbunny.mp4 --holdout $V/bikes.mp4 --precision int8 --clips-per-video 1 --out q8 --quiet >/dev/null 2>&1
echo "calibrate good -> q8: rc $? ; $(ls q8 2>/dev/null | tr '\n' ' ')" >> $OUT
rec "build from failed int8 calibration" . $A build q8 --target rtx --precision int8 --out q8eng --quiet
( env PYTHONPATH=$ROOT python -m runtime.cli export --frames 4 --out term --quiet >/dev/null 2>term.err & pid=$!; sleep 7; kill -TERM $pid; wait $pid; echo "export SIGTERM after 7s	$?	$(tail -1 term.err)	$(ls -A | grep partial | tr '\n' ' ')" >> $OUT )
# 6 concurrency
( $A export --frames 4 --out same --quiet > c1.txt 2>&1 & $A export --frames 8 --out same --quiet > c2.txt 2>&1; wait; echo "two exports to one --out	-	1:$(grep -c written c1.txt) 2:$(grep -c written c2.txt) written	$(ls -A)" >> $OUT )
# 7 prompts
rec "run --prompt 65k tokens" . $A run --model good --video $V/bikes.mp4 --prompt "$(python -c 'print("word "*65000)')" --llm transformers --max-new-tokens 1
rec "run --max-new-tokens -5" . $A run --model good --video $V/bikes.mp4 --prompt hi --llm transformers --max-new-tokens -5
rec "export --frames 7" . $A export --frames 7 --out f7 --quiet
rec "export --out ." . $A export --frames 4 --out . --quiet
rec "visualize --frames-shown abc" . $A visualize --frames 4 --video $V/bikes.mp4 --out o.png --frames-shown abc
rec "--version" . timeout 60 env PYTHONPATH=$ROOT python -m runtime.cli --version
chmod 755 ro
echo "workdir $W" >> $OUT
