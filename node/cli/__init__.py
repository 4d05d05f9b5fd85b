"""node/cli"""
