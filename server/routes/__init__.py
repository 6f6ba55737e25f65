"""HTTP routers: thin, no logic beyond translating between HTTP and the store."""
