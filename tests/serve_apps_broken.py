"""A module whose import fails: ``staple serve --app tests.serve_apps_broken:app`` exits 2."""

raise RuntimeError("this module is broken on purpose")
