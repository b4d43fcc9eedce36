# The operator page (server/static/, served at / by `efficientad serve`) and its browser test.
# The end-to-end test drives Debian's Chromium through Playwright for Python (pinned in the dev group);
# Playwright's own browser download is never used.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install-browser test-ui operator-screenshot

# Debian's chromium, only if it is not there yet (CI runs this before `make test`).
install-browser:
	@if [ -x "$(CHROMIUM)" ]; then \
		echo "chromium present: $(CHROMIUM)"; \
	else \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	fi

# The operator page's browser test alone.
test-ui: install install-browser
	$(PYTHON) -m pytest tests/server/test_operator_page.py -q

# Re-take docs/operator-page.png (1280x800) from the test's page.
operator-screenshot: install install-browser
	EAD_UPDATE_SCREENSHOT=1 $(PYTHON) -m pytest tests/server/test_operator_page.py -q -k screenshot
