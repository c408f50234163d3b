"""Input models: what users write (scenario, serving, sweep and plan files), YAML loading,
``--set`` overrides and Hugging Face ``config.json`` import."""
