package store

import bolt "go.etcd.io/bbolt"

// DB and BucketKeys let the external tests write raw records.
func (s *Bolt) DB() *bolt.DB { return s.db }

var BucketKeys = bucketKeys
