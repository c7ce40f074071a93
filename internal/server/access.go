package server

import (
	"context"

	"strings"

	"time"

	"golang.org/x/time/rate"

	kbv1 "github.com/keybroker/keybroker/api/proto/keybroker/v1"
	"github.com/keybroker/keybroker/internal/authn"
)

// Role is what a tenant's callers may do.
type Role int

// Roles: signers sign and read; admins change keys and read.
const (
	RoleSigner Role = 1 << iota
	RoleAdmin
)

// TenantPolicy is one tenant's access rules.
type TenantPolicy struct {
	Name           string
	Identities     authn.Rule // Tenant is taken from Name
	Roles          Role
	SignsPerSecond float64 // 0: unlimited
	Burst          int
}

// Access maps authenticated callers to tenants and decides what they may
// call. It is built once from the configuration and safe for concurrent use.
type Access struct {
	resolver *authn.Resolver
	tenants  map[string]*tenantAccess
}

type tenantAccess struct {
	roles   Role
	limiter *rate.Limiter // nil: unlimited
}

// CarryOver makes a, built from a reloaded configuration, keep old's
// signing buckets for the tenants whose quota did not change, so a reload
// does not refill them.
func (a *Access) CarryOver(old *Access) {
	if old == nil {
		return
	}
	for name, ta := range a.tenants {
		prev, ok := old.tenants[name]
		if !ok || ta.limiter == nil || prev.limiter == nil {
			continue
		}
		if ta.limiter.Limit() == prev.limiter.Limit() && ta.limiter.Burst() == prev.limiter.Burst() {
			ta.limiter = prev.limiter
		}
	}
}

// NewAccess checks the policies (identities unique across tenants).
func NewAccess(policies []TenantPolicy) (*Access, error) {
	a := &Access{tenants: map[string]*tenantAccess{}}
	var rules []authn.Rule
	for _, p := range policies {
		r := p.Identities
		r.Tenant = p.Name
		rules = append(rules, r)
		ta := &tenantAccess{roles: p.Roles}
		if p.SignsPerSecond > 0 {
			ta.limiter = rate.NewLimiter(rate.Limit(p.SignsPerSecond), p.Burst)
		}
		a.tenants[p.Name] = ta
	}
	res, err := authn.NewResolver(rules)
	if err != nil {
		return nil, err
	}
	a.resolver = res
	return a, nil
}

// Caller is the authenticated caller of an RPC.
type Caller struct {
	Tenant   string
	Identity string // for logs and the audit log
}

type callerKey struct{}

func callerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// tenantOf returns the caller's tenant, which the interceptor put in ctx.
func tenantOf(ctx context.Context) (string, error) {
	c, ok := callerFrom(ctx)
	if !ok {
		return "", errNoCaller
	}
	return c.Tenant, nil
}

// methodRoles says which roles may call each method; a method not listed
// is refused.
var methodRoles = map[string]Role{
	kbv1.KeyBroker_Sign_FullMethodName:              RoleSigner,
	kbv1.KeyBroker_SignStream_FullMethodName:        RoleSigner,
	kbv1.KeyBroker_GetKey_FullMethodName:            RoleSigner | RoleAdmin,
	kbv1.KeyBroker_ListKeys_FullMethodName:          RoleSigner | RoleAdmin,
	kbv1.KeyBroker_GetPublicKey_FullMethodName:      RoleSigner | RoleAdmin,
	kbv1.KeyBroker_GetJWKS_FullMethodName:           RoleSigner | RoleAdmin,
	kbv1.KeyBroker_CreateKey_FullMethodName:         RoleAdmin,
	kbv1.KeyBroker_RotateKey_FullMethodName:         RoleAdmin,
	kbv1.KeyBroker_RevokeKeyVersion_FullMethodName:  RoleAdmin,
	kbv1.KeyBroker_UpdatePolicy_FullMethodName:      RoleAdmin,
	kbv1.KeyBroker_ImportCertificate_FullMethodName: RoleAdmin,

	kbv1.KeyBroker_GetConfirmation_FullMethodName:             RoleSigner | RoleAdmin,
	kbv1.KeyBroker_AttestKey_FullMethodName:                   RoleSigner | RoleAdmin,
	kbv1.KeyBroker_SignJWS_FullMethodName:                     RoleSigner,
	kbv1.KeyBroker_CreateDPoPProof_FullMethodName:             RoleSigner,
	kbv1.KeyBroker_CreateSignedHttpRequest_FullMethodName:     RoleSigner,
	kbv1.KeyBroker_CreateCertificateRequest_FullMethodName:    RoleSigner,
	kbv1.KeyBroker_CreateSelfSignedCertificate_FullMethodName: RoleSigner,
	kbv1.KeyBroker_CreateClientAssertion_FullMethodName:       RoleSigner,

	kbv1.KeyBroker_GetClusterStatus_FullMethodName: RoleAdmin,
	kbv1.KeyBroker_WatchKeys_FullMethodName:        RoleSigner | RoleAdmin,
}

// has reports whether tenant's callers have role.
func (a *Access) has(tenant string, role Role) bool {
	ta := a.tenants[tenant]
	return ta != nil && ta.roles&role != 0
}

// authorize authenticates the peer of ctx and checks its tenant may call
// method. The caller is returned even when the role check fails, so the
// denial can be audited with it.
func (a *Access) authorize(ctx context.Context, method string) (Caller, error) {
	id, ok := authn.FromContext(ctx)
	if !ok {
		return Caller{}, errNoPeer
	}
	// The caller is named by the identity that chose its tenant (a
	// certificate's DNS SAN or CN, say), which is what the audit log records.
	tenant, name, ok := a.resolver.Resolve(id)
	if !ok {
		return Caller{Identity: name}, errUnmapped
	}
	c := Caller{Tenant: tenant, Identity: name}
	need, known := methodRoles[method]
	if !known || a.tenants[tenant].roles&need == 0 {
		return c, errPermissionDenied(method, need)
	}
	return c, nil
}

// allowSign takes a token from the tenant's signing bucket, or says how
// long to wait (RESOURCE_EXHAUSTED with google.rpc.RetryInfo).
func (a *Access) allowSign(tenant string) error {
	lim := a.tenants[tenant].limiter
	if lim == nil {
		return nil
	}
	now := time.Now()
	r := lim.ReserveN(now, 1)
	if !r.OK() {
		return errSignQuotaExhaust
	}
	delay := r.DelayFrom(now)
	if delay == 0 {
		return nil
	}
	r.CancelAt(now)
	return errSignQuota(delay)
}

func shortMethod(full string) string { return full[strings.LastIndexByte(full, '/')+1:] }

func roleNames(r Role) string {
	switch r {
	case RoleSigner:
		return "signer"
	case RoleAdmin:
		return "admin"
	}
	return "signer or admin"
}
