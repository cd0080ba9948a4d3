"""Draft service: runs the draft model, grows token trees, and drives the decode loop per session."""
