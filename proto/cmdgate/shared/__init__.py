"""Code that both the agent and the client need, and nothing else.

The agent and the client never import each other; what they share lives here.
"""
