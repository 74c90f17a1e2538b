"""The run's phases: extract -> feature store -> global phase (the plan) ->
verification -> write; references and blocklists matched in them."""
