"""`geotrain schema`: the recipe's JSON Schema, for editors to complete recipes."""

from geotrain.cli.common import print_json


def schema() -> None:
    """Print the JSON Schema of a recipe (point your editor's YAML plugin at it)."""
    from geotrain.recipe import schema as recipe_schema

    print_json(recipe_schema())
