"""One module per command group, as az's command modules: load_commands registers the
commands, load_arguments their flags; the functions are thin calls to the REST API."""
