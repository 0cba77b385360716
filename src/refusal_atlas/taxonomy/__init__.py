"""refusal_atlas.taxonomy"""
