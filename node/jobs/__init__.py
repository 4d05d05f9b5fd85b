"""node/jobs"""
