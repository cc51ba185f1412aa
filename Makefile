# The first two targets are the README's two commands.
.PHONY: demo test setup bpf lint bench soak soak-agent vmtest dist pymatrix clean

VENV := .venv/bin
PYTEST_ARGS ?=

demo: setup
	$(VENV)/rtml-ebpf demo

test: setup lint
	$(VENV)/python -m pytest $(PYTEST_ARGS)

setup:
	@scripts/setup.sh

bpf: setup
	python3 scripts/build_bpf.py

lint: setup
	$(VENV)/ruff check rtml_ebpf tests benchmarks scripts examples
	$(VENV)/mypy

bench: setup
	$(VENV)/python -m benchmarks.run

# A guarded service flooded for 10 minutes, then the node agent under 100 hostile clients beside
# honest ones for 2 (lease latency p99, the agent's RSS and fds over time). Not in CI.
soak: setup
	$(VENV)/python -m benchmarks.soak
	$(VENV)/python -m benchmarks.soak_agent --minutes 2

# The node agent under 100 hostile clients beside honest ones (lease latency, RSS, fds).
soak-agent: setup
	$(VENV)/python -m benchmarks.soak_agent --minutes 2

# VMTEST_KERNEL=6.1 (default) | 6.12 | backports; VMTEST_ARGS: pytest arguments (default -m vm).
VMTEST_KERNEL ?= 6.1
VMTEST_ARGS ?=
vmtest: setup
	VMTEST_KERNEL=$(VMTEST_KERNEL) scripts/vmtest.sh $(VMTEST_ARGS)

# The sdist and the one abi3 wheel, checked, and installed where no compiler is (as root;
# docs/packaging.md). Output in dist/.
dist:
	scripts/dist.sh

# The tests on Python 3.10-3.13, each in its own virtualenv under .matrix/ (docs/packaging.md).
pymatrix: setup
	scripts/pymatrix.sh

clean:
	rm -rf build dist .dist .matrix *.egg-info rtml_ebpf/bpf/*.o rtml_ebpf/bpf/SOURCES.sha256 rtml_ebpf/*.so \
		.pytest_cache .mypy_cache .ruff_cache
