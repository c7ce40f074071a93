package server

import (
	"context"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/keyring"
)

// ImportCertificate stores a CA-issued chain with a key version (see
// keyring.ImportCertificate for what is checked). An admin change: its
// intent is audited before it is attempted.
func (s *Server) ImportCertificate(ctx context.Context, req *kbv1.ImportCertificateRequest) (*kbv1.ImportCertificateResponse, error) {
	tenant, err := tenantOf(ctx)
	if err != nil {
		return nil, err
	}
	pk, err := s.ring.ImportCertificate(ctx, tenant, req.GetName(), keyring.VersionRef{Version: req.GetVersion(), Kid: req.GetKid()}, req.GetCertificateChain())
	if err != nil {
		return nil, err
	}
	return &kbv1.ImportCertificateResponse{Kid: pk.Kid, Version: pk.Version, X5TS256: pk.X5TS256, ExpireTime: ts(pk.CertExpires)}, nil
}
