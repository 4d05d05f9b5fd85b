"""node/writers"""
