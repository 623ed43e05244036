"""Outcome graders (exact, math-verify, code) and the sandbox that runs untrusted programs."""
