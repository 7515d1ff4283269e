"""Reading, ordering and loading the training data: Parquet inputs under a read guard, the
global epoch order, the streaming loader, tokenizing, span corruption."""
