"""node/sending"""
