"""Orchestrator: public API, routing to draft workers, the budget policy, metrics and the client SDK."""
