"""peftlab.data"""
