"""node/ops"""
