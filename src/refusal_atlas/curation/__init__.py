"""refusal_atlas.curation"""
