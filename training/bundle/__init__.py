"""Bundle stage (``package``): the manifest, model card and conformance set of the bundle the edge loads."""
