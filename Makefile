# RECO: `make demo` runs the main job end to end on the embedded default; `make test` runs the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= .reco-demo
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast venv bench-data bench-ingest bench-search bench-delta bench-quality bench-gpu clean

$(BIN)/reco: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/reco

venv: $(BIN)/reco

# Build a memory from synthetic image-text shards, inspect it, query it, build v2 and swap it in,
# train RECO's fusion layers on it and compare zero-shot accuracy: frozen baseline vs RECO.
demo: venv
	rm -rf $(DEMO)
	$(BIN)/python -m app.synthetic config $(DEMO)/tiny-clip.json
	$(BIN)/python -m app.synthetic wds $(DEMO)/corpus-v1 --shards 4 --per-shard 64 --seed 1 --jitter 0.3
	$(BIN)/python -m app.synthetic wds $(DEMO)/corpus-v2 --shards 4 --per-shard 96 --seed 2 --jitter 0.3
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory build shapes $(DEMO)/corpus-v1 --backbone $(DEMO)/tiny-clip.json --activate
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory list
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory verify shapes
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory query shapes --text "a red circle" -k 5
	$(BIN)/python -m app.synthetic image $(DEMO)/query.png --color blue --shape triangle --jitter 0.3
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory query shapes --image $(DEMO)/query.png -k 5
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory build shapes $(DEMO)/corpus-v2 --backbone $(DEMO)/tiny-clip.json
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory activate shapes 2
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory show shapes
	RECO_HOME=$(DEMO)/home $(BIN)/reco memory query shapes --text "a red circle" -k 5
	RECO_HOME=$(DEMO)/home $(BIN)/reco train shapes-reco --pairs shapes --memory shapes -k 10 --epochs 60 \
		--batch-size 64 --lr 3e-3 --dedup-threshold 1 --val-by item
	RECO_HOME=$(DEMO)/home $(BIN)/reco model list
	$(BIN)/python -m app.synthetic imagefolder $(DEMO)/eval --per-class 3 --jitter 0.3
	RECO_HOME=$(DEMO)/home $(BIN)/reco eval classification --model shapes-reco -k 1,3,10 \
		--dataset imagefolder:$(DEMO)/eval/images --classnames $(DEMO)/eval/classnames.txt
	# the same classes as a class set in the store (frozen and RECO-refined), ranked by a top-k search
	RECO_HOME=$(DEMO)/home $(BIN)/reco classes build shapes-classes --names $(DEMO)/eval/classnames.txt \
		--model shapes-reco --activate
	RECO_HOME=$(DEMO)/home $(BIN)/reco eval classification --model shapes-reco --classes shapes-classes \
		--ranking search --dataset imagefolder:$(DEMO)/eval/images --classnames $(DEMO)/eval/classnames.txt
	RECO_HOME=$(DEMO)/home $(BIN)/reco eval gallery 1 --out $(DEMO)/gallery.html
	RECO_HOME=$(DEMO)/home $(BIN)/reco eval plot 1 --out $(DEMO)/plots
	RECO_HOME=$(DEMO)/home $(BIN)/reco eval compare 1 2
	# the HTTP service on the demo's model, for a few requests (search page at the printed address)
	port=$$($(BIN)/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"); \
	RECO_HOME=$(DEMO)/home $(BIN)/reco serve --port $$port --log-level warning & pid=$$!; \
	trap "kill $$pid" EXIT; \
	$(BIN)/python -m app.serve.client --url http://127.0.0.1:$$port --wait 120 search --text "a red circle" -k 3 && \
	$(BIN)/python -m app.serve.client --url http://127.0.0.1:$$port classify $(DEMO)/query.png \
		--classes "blue triangle,red circle,green square,yellow star"

# The emoji packages (npm) that the quality benchmark and its reduced test read, into a cache outside the repo.
bench-data: venv
	$(BIN)/python -c "from benchmarks.emoji.data import npm_root; print(npm_root())"

test: venv bench-data
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: venv bench-data
	$(BIN)/python -m pytest -q -rs -m "not slow"

bench-ingest: venv
	$(BIN)/python benchmarks/ingest.py

bench-search: venv
	$(BIN)/python benchmarks/search.py

# A delta of 10k new items onto a 1M-item version vs the full build of that version -> benchmarks/results/delta.json
bench-delta: venv
	$(BIN)/python benchmarks/delta.py

# On a CUDA machine: ingest, training, the drop-in model's encode and the fast tests under RECO_DEVICE=cuda ->
# benchmarks/results/gpu.json (refused elsewhere). A GPU machine without network: benchmarks/gpu_wheels.sh here
# first, then bash benchmarks/gpu_device.sh there.
bench-gpu: venv
	$(BIN)/python benchmarks/gpu.py

# RECO vs its untrained start and the frozen base on held-out emoji, both regimes, three seeds:
# benchmarks/results/emoji-{absent,rare}-s{0,1,2}.{json,md,png} and emoji-summary.{json,md}
REGIMES ?= absent rare
SEEDS   ?= 0,1,2
bench-quality: venv bench-data
	for r in $(REGIMES); do $(BIN)/python -m benchmarks.emoji --regime $$r --seeds $(SEEDS) || exit 1; done

clean:
	rm -rf $(DEMO) .reco .pytest_cache
