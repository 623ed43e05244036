"""vLLM servers over HTTP: the client, the served sampler and scorer, start-up agreement checks, `opd serve`."""
