"""node/http_in"""
