"""The Lua scripts that make every state change atomic in Redis; shipped as package data."""
