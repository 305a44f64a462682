# `make run` serves ChatX on http://127.0.0.1:8000; `make test` runs every test.
# Both make their own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: run test test-fast bench cluster-bench redis-server chromium emoji-font nginx iptables clean

$(VENV)/runtime.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/dev.stamp: $(VENV)/runtime.stamp requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/runtime.stamp
	$(PY) -m chatx serve --port $(PORT)

test: $(VENV)/dev.stamp redis-server chromium emoji-font nginx iptables node_modules/axe-core/axe.min.js
	$(PY) -m pytest

# The developer's loop: everything but the browser, deployment, fault and packaging tests, the
# multi-process clusters, the long waits and the CPU floods (tests/conftest.py marks them slow), in
# four pytest-xdist workers: most tests wait on sockets and databases, so four beat two on two cores.
# `make test` stays serial: its fault tests time what a loaded machine would blur.
test-fast: $(VENV)/dev.stamp redis-server
	$(PY) -m pytest -m "not slow" -q -n 4

$(VENV)/bench.stamp: $(VENV)/runtime.stamp bench/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# `make bench BENCH_ARGS=--quick` for a smoke test of a minute or two; results go to bench/results/.
bench: $(VENV)/bench.stamp redis-server
	$(PY) -m bench.run $(BENCH_ARGS)

# The multi-host lab (bench/cluster.py): network-namespace hosts, so root is needed;
# without it, it says so and does nothing. `make cluster-bench CLUSTER_ARGS="--repeat 3"`.
cluster-bench: $(VENV)/bench.stamp redis-server
	$(PY) -m bench.cluster $(CLUSTER_ARGS)

# Tests start their own Redis servers, and the browser tests drive Debian's Chromium.
redis-server:
	@command -v redis-server >/dev/null || { \
	  [ -n "$(ROOT)" ] || { echo "redis-server is missing: install Debian's redis-server package (as root: apt-get install redis-server)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

chromium:
	@command -v /usr/bin/chromium >/dev/null || { \
	  [ -n "$(ROOT)" ] || { echo "chromium is missing: install Debian's chromium package (as root: apt-get install chromium)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# Screenshots of the browser tests show emoji in colour, not as empty boxes.
emoji-font:
	@[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || { \
	  [ -n "$(ROOT)" ] || { echo "the emoji font is missing: install Debian's fonts-noto-color-emoji package (as root: apt-get install fonts-noto-color-emoji)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fonts-noto-color-emoji; }

# tests/test_deploy.py runs Debian's nginx in front of ChatX, as docs/deploy.md shows.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  [ -n "$(ROOT)" ] || { echo "nginx is missing: install Debian's nginx package (as root: apt-get install nginx)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; }

# The fault tests drop packets to their own Redis with iptables.
iptables:
	@command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || { \
	  [ -n "$(ROOT)" ] || { echo "iptables is missing: install Debian's iptables package (as root: apt-get install iptables)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables; }

# The browser tests check every page with axe-core, pinned in package-lock.json (node and npm: Debian's nodejs and npm).
node_modules/axe-core/axe.min.js: package.json package-lock.json
	@command -v npm >/dev/null || { \
	  [ -n "$(ROOT)" ] || { echo "npm is missing: install Debian's nodejs and npm packages (as root: apt-get install nodejs npm)"; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache node_modules
