"""The run config, one module per concern; import from the submodule that owns a name.

- schema: the dataclasses and Literals (RunConfig and its sections), SCHEMA_PATHS; imports nothing from lrexp.
- errors: ConfigError; paths: PROJECT_ROOT, EXPERIMENTS, project_path.
- load: YAML files, presets and `key=value` overrides -> a resolved RunConfig; the key checker, the flattener.
- derive: the values computed from the inputs (the `derived` section).
- checks: the validator, `resolve`; the only config module that imports the registries.

Nothing is re-exported here, so importing the schema never imports the registries and no import cycle runs
through this package.
"""
