using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;

namespace AnyPrecML.AI;

/// <summary>Limits of the OpenAI-compatible endpoints.</summary>
public sealed class AnyPrecisionServerOptions
{
    /// <summary>
    /// Requests generating at once (default 16). More than the cores pay: their decode steps at one width run as shared
    /// passes (<see cref="AnyPrecisionChatClientOptions.MaxBatch"/>), while their prompts take turns on the cores.
    /// </summary>
    public int MaxConcurrentRequests { get; set; } = 16;
    /// <summary>Requests waiting for a slot; one more is refused with 429.</summary>
    public int MaxQueuedRequests { get; set; } = 64;
    /// <summary>Largest request body; a larger one is refused with 413.</summary>
    public long MaxRequestBodyBytes { get; set; } = 1 << 20;
}

/// <summary>
/// The OpenAI HTTP API over the <see cref="AnyPrecisionChatClient"/> registered in DI: <c>GET /v1/models</c>
/// (every width of the parent, plus the bare name for the default width), <c>POST /v1/chat/completions</c>,
/// <c>POST /v1/completions</c> (both streamed as server-sent events with <c>"stream": true</c>) and <c>GET /health</c>.
/// Errors are OpenAI-shaped JSON (<c>{"error": {"message", "type", "param", "code"}}</c>).
/// </summary>
public static class OpenAIEndpoints
{
    private static readonly JsonSerializerOptions Json = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>
    /// Maps the endpoints, and a fallback that answers unknown routes with a 404 error body. Requests past
    /// <see cref="AnyPrecisionServerOptions.MaxConcurrentRequests"/> wait in a queue of
    /// <see cref="AnyPrecisionServerOptions.MaxQueuedRequests"/>; past that they get 429. A client that
    /// disconnects stops its generation and frees its slot.
    /// </summary>
    public static IEndpointRouteBuilder MapAnyPrecisionOpenAI(this IEndpointRouteBuilder endpoints, AnyPrecisionServerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(endpoints);
        options ??= new AnyPrecisionServerOptions();
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxConcurrentRequests, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(options.MaxQueuedRequests);
        var client = endpoints.ServiceProvider.GetRequiredService<AnyPrecisionChatClient>();
        var gate = new RequestGate(options.MaxConcurrentRequests, options.MaxQueuedRequests);

        endpoints.MapGet("/health", (HttpContext ctx) => WriteJson(ctx, 200, new
        {
            status = "ok",
            model = client.Metadata.ModelName,
            running = gate.Running,
            queued = gate.Queued,
        }));
        endpoints.MapGet("/v1/models", (HttpContext ctx) => WriteJson(ctx, 200, new
        {
            @object = "list",
            data = client.Metadata.ModelIds.Select(id => new
            {
                id,
                @object = "model",
                created = 0,
                owned_by = "anyprecml",
                bits = client.ResolveBits(id, null),
            }),
        }));
        endpoints.MapPost("/v1/chat/completions", ctx => Handle(ctx, client, gate, options, chat: true));
        endpoints.MapPost("/v1/completions", ctx => Handle(ctx, client, gate, options, chat: false));
        endpoints.MapFallback(ctx => Error(ctx, 404, $"unknown route {ctx.Request.Method} {ctx.Request.Path}.", "not_found"));
        return endpoints;
    }

    private static async Task Handle(HttpContext ctx, AnyPrecisionChatClient client, RequestGate gate, AnyPrecisionServerOptions options, bool chat)
    {
        var aborted = ctx.RequestAborted;
        try
        {
            if (ctx.Request.ContentLength > options.MaxRequestBodyBytes)
            {
                await Error(ctx, 413, $"the request body has {ctx.Request.ContentLength} bytes; the limit is {options.MaxRequestBodyBytes}.", "request_too_large");
                return;
            }
            if (ctx.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } size) size.MaxRequestBodySize = options.MaxRequestBodyBytes;

            ParsedRequest parsed;
            AnyPrecisionChatClient.PreparedRequest prepared;
            try
            {
                using var doc = await JsonDocument.ParseAsync(ctx.Request.Body, default, aborted);
                parsed = Parse(doc.RootElement, chat);
                prepared = client.Prepare(parsed.Prompt(client), parsed.Options, chat);
            }
            catch (JsonException e)
            {
                await Error(ctx, 400, $"the body is not valid JSON: {e.Message}", "invalid_json");
                return;
            }
            catch (ArgumentException e)
            {
                await Error(ctx, 400, e.Message, e is UnknownModelException ? "model_not_found" : "invalid_value");
                return;
            }
            catch (BadHttpRequestException e)
            {
                await Error(ctx, e.StatusCode, e.StatusCode == 413 ? $"the request body is over the limit of {options.MaxRequestBodyBytes} bytes." : e.Message, e.StatusCode == 413 ? "request_too_large" : "bad_request");
                return;
            }

            using var lease = await gate.EnterAsync(aborted);
            if (lease is null)
            {
                await Error(ctx, 429, $"the server is busy: {gate.Running} requests running and {gate.Queued} queued; try again later.", "rate_limit_exceeded", "server_busy");
                return;
            }
            var response = new ResponseShape(chat, (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N"), DateTimeOffset.UtcNow.ToUnixTimeSeconds(), prepared.ModelId);
            if (parsed.Stream) await Stream(ctx, client, prepared, response, aborted);
            else await Complete(ctx, client, prepared, response, aborted);
        }
        catch (OperationCanceledException) when (aborted.IsCancellationRequested)
        {
            // The client went away: its generation has stopped and its slot is free; nobody is left to answer.
        }
        catch (Exception e) when (!ctx.Response.HasStarted)
        {
            await Error(ctx, 500, $"internal error: {e.Message}", "server_error", "server_error");
        }
        catch (Exception e)
        {
            // Mid-stream: the status is sent, so the error goes out as the last event.
            await WriteEvent(ctx, new { error = ErrorBody($"internal error: {e.Message}", "server_error", "server_error") }, CancellationToken.None);
        }
    }

    private static async Task Complete(HttpContext ctx, AnyPrecisionChatClient client, AnyPrecisionChatClient.PreparedRequest request, ResponseShape shape, CancellationToken ct)
    {
        var text = new StringBuilder();
        AnyPrecisionChatClient.CompletionStep last = default;
        await foreach (var step in client.RunAsync(request, ct))
        {
            text.Append(step.Text);
            last = step;
        }
        object choice = shape.Chat
            ? new { index = 0, message = new { role = "assistant", content = text.ToString() }, finish_reason = FinishReason(last), logprobs = (object?)null }
            : new { index = 0, text = text.ToString(), finish_reason = FinishReason(last), logprobs = (object?)null };
        await WriteJson(ctx, 200, new
        {
            id = shape.Id,
            @object = shape.Chat ? "chat.completion" : "text_completion",
            created = shape.Created,
            model = shape.Model,
            choices = new[] { choice },
            usage = Usage(request, last),
            route = Route(request),
        });
    }

    private static async Task Stream(HttpContext ctx, AnyPrecisionChatClient client, AnyPrecisionChatClient.PreparedRequest request, ResponseShape shape, CancellationToken ct)
    {
        ctx.Response.StatusCode = 200;
        ctx.Response.ContentType = "text/event-stream";
        ctx.Response.Headers.CacheControl = "no-cache";
        string kind = shape.Chat ? "chat.completion.chunk" : "text_completion";
        object Chunk(string? text, string? finish, bool first) => new
        {
            id = shape.Id,
            @object = kind,
            created = shape.Created,
            model = shape.Model,
            choices = new[]
            {
                shape.Chat
                    ? (object)new { index = 0, delta = first ? new { role = "assistant", content = text ?? "" } : text is null ? new { } : (object)new { content = text }, finish_reason = finish, logprobs = (object?)null }
                    : new { index = 0, text = text ?? "", finish_reason = finish, logprobs = (object?)null },
            },
        };
        if (shape.Chat) await WriteEvent(ctx, Chunk("", null, first: true), ct);
        await foreach (var step in client.RunAsync(request, ct))
        {
            if (step.Text.Length > 0) await WriteEvent(ctx, Chunk(step.Text, null, first: false), ct);
            if (step.FinishReason is null) continue;
            await WriteEvent(ctx, Chunk(null, FinishReason(step), first: false), ct);
            // OpenAI sends usage in a last chunk with no choices; it is always sent here.
            await WriteEvent(ctx, new { id = shape.Id, @object = kind, created = shape.Created, model = shape.Model, choices = Array.Empty<object>(), usage = Usage(request, step), route = Route(request) }, ct);
        }
        await ctx.Response.WriteAsync("data: [DONE]\n\n", ct);
        await ctx.Response.Body.FlushAsync(ct);
    }

    /// <summary>The router's decision for a request with "latency_budget_ms" or "draft_bits": "auto" (an extension field; OpenAI clients ignore it), else null.</summary>
    private static object? Route(AnyPrecisionChatClient.PreparedRequest request) => request.Route is { } r
        ? new { budget_ms = r.BudgetMs, bits = r.Route.Bits, draft_bits = r.Route.DraftBits, draft_tokens = r.Route.DraftTokens, ms_per_token = Math.Round(r.Route.MsPerToken, 4), reason = r.Reason }
        : null;

    /// <summary>The fields of a chat or completion request this server reads, checked for type.</summary>
    private sealed record ParsedRequest(List<ChatMessage>? Messages, string? RawPrompt, ChatOptions Options, bool Stream)
    {
        public string Prompt(AnyPrecisionChatClient client) => Messages is not null ? client.Metadata.Template.Format(Messages) : RawPrompt!;
    }

    private static ParsedRequest Parse(JsonElement body, bool chat)
    {
        if (body.ValueKind != JsonValueKind.Object) throw new ArgumentException("the body must be a JSON object.");
        var options = new ChatOptions
        {
            ModelId = String(body, "model"),
            MaxOutputTokens = Integer(body, "max_completion_tokens") ?? Integer(body, "max_tokens"),
            Temperature = (float?)Number(body, "temperature"),
            TopP = (float?)Number(body, "top_p"),
            TopK = Integer(body, "top_k"),
            Seed = body.TryGetProperty("seed", out var seed) && seed.ValueKind != JsonValueKind.Null
                ? seed.TryGetInt64(out long s) ? s : throw new ArgumentException("'seed' must be an integer.") : null,
            StopSequences = Stops(body),
        };
        if (Integer(body, "bits") is int bits) (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.BitsProperty] = bits;
        if (body.TryGetProperty("draft_bits", out var draftField) && draftField.ValueKind == JsonValueKind.String)
            (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.DraftBitsProperty] = draftField.GetString() == AnyPrecisionChatClient.AutoDraft
                ? AnyPrecisionChatClient.AutoDraft : throw new ArgumentException($"'draft_bits' must be an integer or \"{AnyPrecisionChatClient.AutoDraft}\".");
        else if (Integer(body, "draft_bits") is int draft) (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.DraftBitsProperty] = draft;
        if (Integer(body, "draft_tokens") is int k) (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.DraftTokensProperty] = k;
        if (Number(body, "latency_budget_ms") is double budget) (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.LatencyBudgetProperty] = budget;
        if (String(body, "over_budget") is { } over) (options.AdditionalProperties ??= [])[AnyPrecisionChatClient.OverBudgetProperty] = over;
        if (Integer(body, "n") is int n && n != 1) throw new ArgumentException($"'n' must be 1 (one choice per request), not {n}.");
        bool stream = body.TryGetProperty("stream", out var st) && st.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False or JsonValueKind.Null => false,
            _ => throw new ArgumentException("'stream' must be true or false."),
        };
        if (!chat)
        {
            if (!body.TryGetProperty("prompt", out var p)) throw new ArgumentException("'prompt' is required.");
            string prompt = p.ValueKind switch
            {
                JsonValueKind.String => p.GetString()!,
                JsonValueKind.Array when p.GetArrayLength() == 1 && p[0].ValueKind == JsonValueKind.String => p[0].GetString()!,
                _ => throw new ArgumentException("'prompt' must be a string (or an array of one string)."),
            };
            return new ParsedRequest(null, prompt, options, stream);
        }
        if (!body.TryGetProperty("messages", out var m) || m.ValueKind != JsonValueKind.Array || m.GetArrayLength() == 0)
            throw new ArgumentException("'messages' must be a non-empty array.");
        List<ChatMessage> messages = [];
        foreach (var message in m.EnumerateArray())
        {
            if (message.ValueKind != JsonValueKind.Object) throw new ArgumentException("each message must be an object with 'role' and 'content'.");
            string role = String(message, "role") ?? throw new ArgumentException("each message needs a 'role'.");
            if (role is not ("system" or "developer" or "user" or "assistant" or "tool")) throw new ArgumentException($"unknown message role '{role}'.");
            messages.Add(new ChatMessage(new ChatRole(role == "developer" ? "system" : role), Content(message)));
        }
        return new ParsedRequest(messages, null, options, stream);
    }

    private static string Content(JsonElement message)
    {
        if (!message.TryGetProperty("content", out var c) || c.ValueKind == JsonValueKind.Null) return "";
        if (c.ValueKind == JsonValueKind.String) return c.GetString()!;
        if (c.ValueKind != JsonValueKind.Array) throw new ArgumentException("'content' must be a string or an array of text parts.");
        var text = new StringBuilder();
        foreach (var part in c.EnumerateArray())
        {
            if (part.ValueKind != JsonValueKind.Object || String(part, "type") != "text")
                throw new ArgumentException("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.");
            text.Append(String(part, "text"));
        }
        return text.ToString();
    }

    private static List<string>? Stops(JsonElement body)
    {
        if (!body.TryGetProperty("stop", out var s) || s.ValueKind == JsonValueKind.Null) return null;
        if (s.ValueKind == JsonValueKind.String) return [s.GetString()!];
        if (s.ValueKind == JsonValueKind.Array && s.EnumerateArray().All(x => x.ValueKind == JsonValueKind.String))
            return [.. s.EnumerateArray().Select(x => x.GetString()!)];
        throw new ArgumentException("'stop' must be a string or an array of strings.");
    }

    private static string? String(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString() : throw new ArgumentException($"'{name}' must be a string.");

    private static int? Integer(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int i) ? i : throw new ArgumentException($"'{name}' must be an integer.");

    private static double? Number(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.Number ? v.GetDouble() : throw new ArgumentException($"'{name}' must be a number.");

    private sealed record ResponseShape(bool Chat, string Id, long Created, string Model);

    private static string FinishReason(AnyPrecisionChatClient.CompletionStep step) => step.FinishReason == ChatFinishReason.Length ? "length" : "stop";

    private static object Usage(AnyPrecisionChatClient.PreparedRequest request, AnyPrecisionChatClient.CompletionStep last) =>
        new { prompt_tokens = request.PromptTokens, completion_tokens = last.OutputTokens, total_tokens = request.PromptTokens + last.OutputTokens };

    private static object ErrorBody(string message, string type, string? code) => new { message, type, param = (string?)null, code };

    private static Task Error(HttpContext ctx, int status, string message, string code, string type = "invalid_request_error") =>
        WriteJson(ctx, status, new { error = ErrorBody(message, type, code) });

    private static async Task WriteJson(HttpContext ctx, int status, object value)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json";
        await ctx.Response.Body.WriteAsync(JsonSerializer.SerializeToUtf8Bytes(value, Json));
    }

    private static async Task WriteEvent(HttpContext ctx, object value, CancellationToken ct)
    {
        await ctx.Response.WriteAsync("data: " + JsonSerializer.Serialize(value, Json) + "\n\n", ct);
        await ctx.Response.Body.FlushAsync(ct);
    }

    /// <summary>
    /// Slots for generating requests and a bounded queue before them: a request past both is refused at
    /// once rather than left to wait without end.
    /// </summary>
    private sealed class RequestGate(int slots, int queue)
    {
        private readonly SemaphoreSlim _slots = new(slots, slots);
        private int _admitted, _running;

        public int Running => Volatile.Read(ref _running);
        public int Queued => Math.Max(0, Volatile.Read(ref _admitted) - Running);

        /// <summary>A lease on a slot (dispose it to free the slot), or null when every slot and queue place is taken.</summary>
        public async Task<IDisposable?> EnterAsync(CancellationToken ct)
        {
            if (Interlocked.Increment(ref _admitted) > slots + queue)
            {
                Interlocked.Decrement(ref _admitted);
                return null;
            }
            try { await _slots.WaitAsync(ct); }
            catch
            {
                Interlocked.Decrement(ref _admitted);
                throw;
            }
            Interlocked.Increment(ref _running);
            return new Lease(this);
        }

        private sealed class Lease(RequestGate gate) : IDisposable
        {
            private int _released;

            public void Dispose()
            {
                if (Interlocked.Exchange(ref _released, 1) != 0) return;
                Interlocked.Decrement(ref gate._running);
                Interlocked.Decrement(ref gate._admitted);
                gate._slots.Release();
            }
        }
    }
}
