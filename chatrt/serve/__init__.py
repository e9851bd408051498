"""`chatrt serve`: the OpenAI-compatible HTTP face of a runtime (app), its wire format (wire), and session reuse
for clients that resend the whole conversation (stateless)."""
