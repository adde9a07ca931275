"""HTTP layer: routes, request/response schemas, auth, error mapping, middleware."""
