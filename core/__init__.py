"""What workflows and activities both speak: pure definitions, no effects.

The activity contracts (names, inputs, results, error types), the provider
registry and the closed ``provider_options`` schemas. Standard library and
pydantic only: the workflow sandbox passes this package through whole, and
``llmmixer validate`` reads it without importing any provider SDK. Nothing
here imports another llmmixer package.
"""
