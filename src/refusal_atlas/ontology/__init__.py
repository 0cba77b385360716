"""refusal_atlas.ontology"""
