# Shortcuts for the README's two commands (which need only bash: scripts/demo.sh, scripts/test.sh).
.PHONY: demo test
demo:
	bash scripts/demo.sh $(ARGS)
test:
	bash scripts/test.sh $(ARGS)
