# pagoda: one command to set up and test, one to try it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PAGODA := $(VENV)/bin/pagoda
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# two test processes, each taking whole test files (module fixtures such as servers start once)
TEST_WORKERS ?= 2
# one CPU thread for torch in each test process and the servers it starts: with a thread per
# core in every process the workers oversubscribe the cores (2 cores: 724-875 s -> 530 s)
TEST_THREADS ?= 1

.PHONY: install model deploy-tools test generate chat serve clean

$(STAMP): pyproject.toml constraints/cpu.txt deploy/install.sh
	$(PYTHON) -m venv $(VENV)
	sh deploy/install.sh $(PY) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PAGODA) pull smollm2
	$(PAGODA) pull gemma3-270m

# The real tools the deploy/ tests run besides the Python ones: Prometheus and promtool (Debian's
# package, installed when missing and we are root with apt) and the published schemas (npm).
deploy-tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends prometheus >/dev/null; } || \
		echo "WARNING: could not install Debian's prometheus (needs root and apt): its tests will skip"
	@command -v npm >/dev/null && npm ci --prefix tests/deploy/node --no-audit --no-fund --silent || \
		echo "WARNING: npm is missing or failed: the schema checks that need it will skip"

test: model deploy-tools
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

generate: model
	$(PAGODA) generate "The capital of France is" --raw --max-tokens 32 --stop '\n'

chat: model
	$(PAGODA) chat

clean:
	rm -rf $(VENV) .pytest_cache

serve: model
	$(PAGODA) serve $(SERVE_ARGS)
