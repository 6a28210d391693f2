"""The admin listener: the admin API and the status page.
"""
