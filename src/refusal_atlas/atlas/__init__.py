"""refusal_atlas.atlas"""
