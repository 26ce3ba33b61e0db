"""The /v1 API, one router per family: each module has a `router` (FastAPI) and a
`describe(ctx)` giving its models' entries for `GET /v1/models`."""
