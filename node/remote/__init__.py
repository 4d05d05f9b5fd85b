"""node/remote"""
