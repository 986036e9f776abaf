"""peftlab.evaluate"""
